//! Placeholder (bench written next).
fn main() {}
