"""Property-based fuzzing (hypothesis) of every RPC of every service: the servers stay up and every error
is a proper status (tests/security/fuzz.py says which are).

One cluster of its own (a random-init tiny Llama with a small tokenizer, 2 stages on 2 CPU nodes,
sequences of at most 16 tokens so that valid generations end within a few steps). Each RPC gets
``TENSORFLEET_FUZZ_EXAMPLES`` cases (default 2000): random messages or raw bytes, with random credentials
(mostly the valid ones, so the handlers are fuzzed, not only the guard). After each case the cluster's
processes must be alive; after each RPC the cluster must serve a normal generation again (a fuzzed Join
may have started a re-placement that fails over) with no member left over from the fuzzing.

What is not sent: a Leave that names a real node (draining it is Leave's job), and a LoadStage with the
join token that passes the node's checks (it would replace the running stage with a random one, which
is the coordinator's right; each would cost seconds of loading). LoadStages that fail the checks, or
carry wrong credentials, are sent. For longer runs: scripts/fuzz_rpcs.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

from tests.security import fuzz, http_fuzz

EXAMPLES = int(os.environ.get("TENSORFLEET_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck), print_blob=True)
RPCS = ["Generate", "Status", "Join", "Heartbeat", "Leave", "GetManifest", "FetchWeights", "LoadStage", "Forward",
        "Probe", "Share"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):  # noqa: ANN201
    with fuzz.local_cluster(tmp_path_factory.mktemp("fuzz")) as cluster:
        h = fuzz.Harness(cluster.address, api_key=cluster.api_key, join_token=cluster.secrets.join_token,
                         procs=cluster.procs, expected_exits=cluster.expected_exits, http_url=cluster.http_url)
        try:
            assert h.wait_serving() == ""
            yield h
            print("\n" + h.tally.table())
        finally:
            h.close()


def test_every_rpc_is_fuzzed() -> None:
    assert sorted(RPCS) == sorted(fuzz.RPCS)


@pytest.mark.slow
@pytest.mark.parametrize("name", RPCS)
def test_fuzz(harness: fuzz.Harness, name: str) -> None:
    rpc = fuzz.RPCS[name]
    problem = harness.wait_serving()  # a previous RPC's junk may still be failing over
    assert problem == "", f"the cluster does not serve before fuzzing {name}: {problem}"
    facts, secrets, addresses = harness.setup(rpc)

    @FUZZ
    @given(case=fuzz.cases(rpc, facts, secrets, accept=harness.accept(rpc, facts)))
    def one_call(case: fuzz.Case) -> None:
        outcome, reason = harness.check(case, addresses)
        assert reason is None, f"{reason}\n{outcome}"

    for known in fuzz.known_cases(rpc, facts, secrets):  # what the fuzzing found once: always tried
        one_call = example(case=known)(one_call)
    one_call()
    counts = harness.tally.counts.get(name, {})
    print(f"\n{name}: {sum(counts.values())} calls: {dict(sorted(counts.items()))}")
    problem = harness.wait_serving()
    assert problem == "", f"the cluster does not serve after fuzzing {name}: {problem}"
    assert not harness.dead()


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", sorted(http_fuzz.ENDPOINTS))
def test_fuzz_http(harness: fuzz.Harness, endpoint: str) -> None:
    """Every HTTP endpoint: random requests (tests/security/http_fuzz.py) get proper answers, and the
    cluster's processes stay up."""
    model = harness.status().model
    secrets = http_fuzz.Secrets(api_key=harness.api_key, join_token=harness.join_token)
    tally = http_fuzz.Tally()

    @FUZZ
    @given(case=http_fuzz.cases(endpoint, model, secrets))
    def one_request(case: http_fuzz.Case) -> None:
        outcome = http_fuzz.perform(harness.http_url, case, timeout=harness.timeout)
        reason = tally.add(case, outcome)
        assert reason is None, f"{reason}\n{case!r}"
        assert not harness.dead(), f"process(es) died after {case!r}"

    for known in http_fuzz.known_cases(endpoint, model, secrets):  # what the fuzzing found once
        one_request = example(case=known)(one_request)
    one_request()
    counts = tally.counts[endpoint]
    print(f"\n{endpoint}: {sum(counts.values())} requests: {dict(sorted(counts.items()))}")
    for count, status, message in tally.common_details(endpoint):
        print(f"  {count:5d} x {status}: {message}")
    assert sum(counts.values()) >= EXAMPLES
