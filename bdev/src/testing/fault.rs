//! Fault-injecting bdev (filled in below).
