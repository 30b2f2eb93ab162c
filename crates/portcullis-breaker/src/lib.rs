//! Circuit-breaker fallback layer: primary -> fallback after N failures, probed recovery.
//!
//! (Under construction.)

