"""Seeing the data: the HTML report and its plots, Datasette (browse), the CLI's progress bar.

May import: everything below it (export, launch, recipes, tasks, runs, ...)."""
