//! turnctl's commands, as a library so tests and other tools can call them.

pub mod admin;
pub mod check;
pub mod jitsi;
