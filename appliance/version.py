"""The appliance's version: one place, read by the package, the CLI and the run rows' provenance."""

VERSION = "0.1.0"
