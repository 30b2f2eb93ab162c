//! Health-gated load balancing over replicas: tiers, first-healthy / round-robin / p2c, outlier ejection.
//!
//! (Under construction.)

