"""Fuzzing p2pchat: targets (:mod:`.targets`, :mod:`.node`), their seeds (:mod:`.corpus`), the mutator
(:mod:`.mutate`), the long campaign (``python -m tests.fuzz.campaign``) and the loopback flood
(``python -m tests.fuzz.flood``).  The bounded runs in the test suite are ``tests/test_fuzz_*.py``."""
