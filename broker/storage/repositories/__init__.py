"""The broker's repositories, one per area, each running its statements through one
:class:`broker.storage.engine.Database` (its transactions, or a decision's unit of work):

* :mod:`.attesters`: EKs, AKs, credential challenges;
* :mod:`.parties`: parties and their data keys;
* :mod:`.policy`: golden PCR sets and approvals;
* :mod:`.sessions`: attested sessions;
* :mod:`.keks`: KEK fingerprints and party KEKs;
* :mod:`.nonces`: the nonce table;
* :mod:`.audit`: reading the audit chain (appending happens in the unit of work);
* :mod:`.status`: the schema revision and row counts (``GetStatus``, readiness).

:class:`broker.storage.Store` composes them.
"""
