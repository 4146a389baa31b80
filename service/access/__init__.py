"""Who may do what: the clients (tokens file), their roles, and which role each RPC needs."""
