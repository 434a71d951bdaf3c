"""Memory and time as the data or the bank grows."""
