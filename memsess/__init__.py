"""memsess: web sessions in a cluster of memcached servers, with redundancy."""
