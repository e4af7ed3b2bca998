"""The router: validates client requests, picks nodes from live membership, relays tokens."""
