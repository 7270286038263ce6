"""kvstore: the node server, storage, local cluster launcher and CLI of the store."""
