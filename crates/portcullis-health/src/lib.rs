//! Active health checking, liveness/readiness routes and a standalone HealthServer.
//!
//! (Under construction.)

