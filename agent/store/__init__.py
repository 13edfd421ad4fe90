"""Store: the journal, durable no-replace file operations, filing into archive/ and failed/, spool
adoption and journal repair."""
