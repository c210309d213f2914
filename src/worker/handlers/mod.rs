//! What a routed request is answered with, one module per route type, each owning its route
//! type; and the access checks every route has. Everything here decides a response; nothing
//! here does I/O on the client socket.

pub mod access;
pub mod files;
pub mod metrics;
pub mod redirect;
pub mod welcome;
