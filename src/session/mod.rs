//! The per-device session loop.
