//! How an origin checks that a visitor came through the queue: online verification
//! (`POST /api/v1/verify`) and forward auth for reverse proxies (`GET /auth/{room}`).
