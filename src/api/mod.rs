//! The HTTP API for application servers.
