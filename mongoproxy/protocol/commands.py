"""Which command is what: the one classification table every module uses.

Casing rule: names here are lower-case and a command name is looked up with `name.lower()` (the server
accepts `isMaster` and `ismaster`; credentials must be found whatever casing a client sends). Keys are
BSON field names and are matched exactly, as the server does.
"""

from __future__ import annotations

# The connection handshake and the drivers' server monitoring (SDAM monitors and RTT pings send only these).
HELLO_COMMANDS = frozenset({"hello", "ismaster"})
MONITORING_COMMANDS = HELLO_COMMANDS

# Commands whose request or reply is a credential exchange (SASL/SCRAM, legacy MONGODB-CR/X.509 auth).
AUTH_COMMANDS = frozenset(
    {"saslstart", "saslcontinue", "authenticate", "getnonce", "copydbsaslstart", "copydbgetnonce", "copydb", "logout"}
)
# User management commands that carry a password (`pwd`).
USER_MANAGEMENT_COMMANDS = frozenset({"createuser", "updateuser"})

# Requests (and their replies) that may carry a secret: the recorder holds and blanks them, tracing never
# samples them (the drivers' command-monitoring spec leaves the same ones out), the query log redacts them.
SENSITIVE_COMMANDS = HELLO_COMMANDS | AUTH_COMMANDS | USER_MANAGEMENT_COMMANDS
# Commands whose whole body is a credential exchange: every value is hidden, even with --no-redact.
SECRET_COMMANDS = AUTH_COMMANDS

# Keys whose value (the whole subtree) is a secret wherever it appears; the Cython scanner's rendering blanks
# exactly these (tests/unit/test_protocol_commands.py checks that it agrees).
SECRET_KEYS = frozenset({"payload", "pwd", "speculativeAuthenticate"})
# Inside a sensitive message, the legacy auth fields are secrets too (elsewhere `key` is an index spec).
CREDENTIAL_KEYS = SECRET_KEYS | {"key", "nonce"}
CREDENTIAL_KEYS_BYTES = frozenset(k.encode() for k in CREDENTIAL_KEYS)

# Commands whose first value, when a string, names a collection (exact names, as the server matches them).
# Others (usersInfo: "name", getLog: "global", ...) would leak non-collection values into labels.
COLLECTION_COMMANDS = frozenset(
    """
    find insert update delete aggregate count distinct findAndModify findandmodify getMore create drop
    createIndexes dropIndexes listIndexes collMod killCursors mapReduce validate compact collStats reIndex
    geoNear geoSearch planCacheClear planCacheClearFilters planCacheListFilters planCacheSetFilter analyze
    createSearchIndexes dropSearchIndex updateSearchIndex listSearchIndexes cleanupOrphaned
    """.split()
)

# Commands that only read: what `mongoproxy replay --read-only` sends (aggregate only without $out/$merge);
# killCursors writes nothing and frees what they opened.
READ_ONLY_COMMANDS = frozenset({"find", "aggregate", "count", "distinct", "getmore", "killcursors"})

# Commands that stop, reconfigure or wipe a server, replica set, cluster, users and roles, or a whole database:
# replay does not send them unless --allow-destructive. Collection-level drop, dropIndexes and delete are
# application workload and are not in this list.
DESTRUCTIVE_COMMANDS = frozenset(
    {
        # the server
        "shutdown",
        "fsync",
        "fsyncunlock",
        "setparameter",
        "setclusterparameter",
        "setfeaturecompatibilityversion",
        "setdefaultrwconcern",
        "logrotate",
        "compact",
        "applyops",
        "repairdatabase",
        "resync",
        "killop",
        "killsessions",
        "killallsessions",
        "killallsessionsbypattern",
        "dropconnections",
        "configurefailpoint",
        "sleep",
        "emptycapped",
        # a whole database
        "dropdatabase",
        # users and roles (createUser/updateUser are not replayed anyway: their passwords are blanked)
        "dropuser",
        "dropallusersfromdatabase",
        "droprole",
        "dropallrolesfromdatabase",
        "revokerolesfromuser",
        "revokerolesfromrole",
        "revokeprivilegesfromrole",
        # the replica set
        "replsetinitiate",
        "replsetreconfig",
        "replsetstepdown",
        "replsetfreeze",
        "replsetmaintenance",
        "replsetsyncfrom",
        "replsetresizeoplog",
        "replsetabortprimarycatchup",
        # the sharded cluster
        "addshard",
        "removeshard",
        "addshardtozone",
        "removeshardfromzone",
        "updatezonekeyrange",
        "moveprimary",
        "movechunk",
        "moverange",
        "movecollection",
        "unshardcollection",
        "reshardcollection",
        "commitreshardcollection",
        "abortreshardcollection",
        "refinecollectionshardkey",
        "cleanuporphaned",
        "clearjumboflag",
        "balancerstart",
        "balancerstop",
        "transitiontodedicatedconfigserver",
        "transitionfromdedicatedconfigserver",
    }
)


def is_hello(name: str) -> bool:
    """True for the handshake/monitoring command, whatever its casing."""
    return name.lower() in HELLO_COMMANDS


def is_sensitive(name: str) -> bool:
    """True when the command or its reply may carry a secret."""
    return name.lower() in SENSITIVE_COMMANDS


def is_secret(name: str) -> bool:
    """True when every value of the command is a credential."""
    return name.lower() in SECRET_COMMANDS


def pipeline_writes(pipeline: object) -> bool:
    """True when an aggregate pipeline writes ($out or $merge): such an aggregate is not read-only."""
    if not isinstance(pipeline, (list, tuple)):
        return False
    for stage in pipeline:
        try:
            if "$out" in stage or "$merge" in stage:
                return True
        except TypeError:  # a stage that is not a document
            continue
    return False
