//! vhost: vhost-user-blk target (issue: vhost-user-blk target). Not yet implemented.
