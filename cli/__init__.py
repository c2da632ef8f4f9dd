"""The `compress` command line: parsing, calling the library, printing. No logic of its own."""
