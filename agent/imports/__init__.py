"""SaaSquatch import rules: types, remote naming, validation, splitting, quarantine texts and the
names a configured prefix or folder may take (namerules).

Pure and I/O-light: the daemon and the CLI call these functions; nothing here moves a file except
through a move the caller passes in (splitting). Nothing of the agent outside this folder is
imported (tests/test_walls.py): the configuration is read through the `ImportRules` protocol.
"""
