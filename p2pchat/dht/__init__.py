"""The Kademlia DHT service: the trio shell around the pure core (routing table, lookups, records)."""
