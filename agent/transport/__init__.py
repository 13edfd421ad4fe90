"""Transport: the SFTP session, pipelined requests, the publish protocol, remote status conventions.
Knows no journal."""
