"""imgbase-agent: the node's cluster agent (joins etcd, reports capabilities)."""
