//! Server-rendered visitor pages: minijinja templates compiled into the binary.
