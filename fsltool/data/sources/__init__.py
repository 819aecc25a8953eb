"""Dataset sources, each a function of its options returning a SourceListing."""
