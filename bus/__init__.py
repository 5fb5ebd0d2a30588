"""The event contract: events, codec, ids, signing, streams, publishing, the runner, the embedded server."""
