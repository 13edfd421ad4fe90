"""SaaSquatch import rules: types, remote naming, validation, splitting, quarantine texts and the
names a configured prefix or folder may take (namerules).

Pure and I/O-light: the daemon and the CLI call these functions; nothing here moves a file. Import
the modules themselves (agent.imports.naming, ...): this package imports nothing at load, so the
configuration module can use namerules without a cycle.
"""
