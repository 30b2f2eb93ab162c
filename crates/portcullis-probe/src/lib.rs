//! Throughput probing: finds how many concurrent requests an endpoint can take.
//!
//! (Under construction.)

