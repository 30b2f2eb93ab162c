//! Redis-shared in-flight counter, capacity store and readiness check.
//!
//! (Under construction.)

