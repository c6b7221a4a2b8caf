"""Contract suites: one file per protocol, each with an implementations list that every shipped component is in."""
