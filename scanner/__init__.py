"""The scanning daemon and the `flakescan` command line."""
