//! git ref listing through the SOCKS5 proxy (being written).
