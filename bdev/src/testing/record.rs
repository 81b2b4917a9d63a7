//! Recording bdev (filled in below).
