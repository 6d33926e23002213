"""The ``scalestack`` command line: one file per command, each thin (parse, call the library, print)."""
