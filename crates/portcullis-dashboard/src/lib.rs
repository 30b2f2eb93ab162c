//! Operator routes: /balancer/stats, /metrics and the /balancer/ui dashboard.
//!
//! (Under construction.)

