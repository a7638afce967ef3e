"""PTUnifier: prompt pools unify fusion- and dual-encoder use (see `method`)."""
