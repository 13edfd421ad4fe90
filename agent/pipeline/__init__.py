"""Pipeline: the upload threads and what follows a published file (status poll, archive, retention,
notifications)."""
