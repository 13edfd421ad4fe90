"""Intake: notice files in drop/, wait until each is finished, claim it into the spool, check it."""
