"""nftables: a Transaction that renders ``nft -f`` text (pure) and executors that run it.

Modelled on kubernetes-sigs/knftables: operations are validated eagerly when added, the first
error is kept and returned by ``run`` without executing anything, and the executor is
injectable (``NftCli`` runs the real ``nft``; ``FakeNft`` applies the transaction in memory,
all or nothing, for tests without root).
"""
