//! HTTP through the SOCKS5 proxy (being written).
