//! Admission control: per-endpoint capacity, FIFO queue, 504 on queue timeout, 503 when unhealthy.
//!
//! (Under construction.)

