#!/usr/bin/env bash
# Starts one broker of the compose profile `cluster` (docker-compose.kafka.yml) in the
# apache/kafka image: TLS on every listener, SCRAM users that exist from the first start.
#
# The image's own start (/etc/kafka/docker/run) turns the KAFKA_* variables into
# server.properties and formats the storage, but adds no SCRAM user, and brokers that
# authenticate each other with SCRAM could then never start. So, before handing over:
#
#  1. the key store's password (the secret KAFKA_SSL_KEYSTORE_CREDENTIALS names) and
#     every SASL listener's login (user `broker`, password from the secret
#     kafka-broker-password) are set as variables of this process only: never in the
#     compose file, so never in `docker inspect` or `docker compose config`. The image's
#     start would set the key store itself only for listeners it takes for TLS ones
#     ("SSL://" in KAFKA_ADVERTISED_LISTENERS; named listeners are not); in case it
#     does, the files are also linked into /etc/kafka/secrets, where it looks for them;
#  2. the storage is formatted with every user of SCRAM_USERS (password: the secret
#     kafka-<user>-password), from a server.properties rendered from the same KAFKA_*
#     variables by the image's rule; a formatted storage is left as it is (changing a
#     password later: kafka-configs.sh --alter --add-config, see docs/deploy.md);
#  3. a client config for the healthcheck is written (user `broker`, mode 0600);
#  4. the image's own start runs; its format step finds the storage formatted, says
#     "already formatted", and accepts that.
#
# BROKER_SECRETS, BROKER_IMAGE_SECRETS, BROKER_KAFKA_DIR and BROKER_RUN point elsewhere
# for tests (tests/unit/test_container_files.py runs this script with stand-ins).
set -euo pipefail

secrets=${BROKER_SECRETS:-/run/secrets}
image_secrets=${BROKER_IMAGE_SECRETS:-/etc/kafka/secrets}
kafka=${BROKER_KAFKA_DIR:-/opt/kafka}
run=${BROKER_RUN:-/etc/kafka/docker/run}

die() {
    echo "kafka-broker.sh: $*" >&2
    exit 1
}

# A password from a secret file, if --add-scram and a quoted JAAS option can carry it.
password() {
    local file=$secrets/$1 value
    [[ -r $file ]] || die "$file is missing or unreadable (python -m agentstream.infra.compose check)"
    value=$(<"$file")
    [[ $value =~ ^[A-Za-z0-9_.~-]{16,}$ ]] ||
        die "$file: a password here is 16 or more of A-Z a-z 0-9 _ . ~ -"
    printf '%s' "$value"
}

# server.properties from the KAFKA_* variables, by the image's rule (KafkaDockerWrapper):
# drop KAFKA_, lower case, "_" -> ".", "..." -> "-", ".." -> "_".
render_properties() {
    local name key
    while read -r name; do
        case $name in
        KAFKA_VERSION | KAFKA_HOME | KAFKA_OPTS | KAFKA_*_OPTS | KAFKA_JMX_* | KAFKA_LOG4J_* | KAFKA_TOOLS_LOG4J_*)
            continue
            ;;
        esac
        key=${name#KAFKA_}
        key=${key,,}
        key=${key//_/.}
        key=${key//.../-}
        key=${key//../_}
        printf '%s=%s\n' "$key" "${!name}"
    done < <(compgen -A export | grep '^KAFKA_' || true)
}

mechanism=${KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL:?the SCRAM mechanism brokers use}
[[ $mechanism == SCRAM-SHA-256 || $mechanism == SCRAM-SHA-512 ]] ||
    die "KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL=$mechanism: this script sets up SCRAM only"

# 1.
for name in "${KAFKA_SSL_KEYSTORE_FILENAME:?}" "${KAFKA_SSL_KEYSTORE_CREDENTIALS:?}" \
    "${KAFKA_SSL_KEY_CREDENTIALS:?}"; do
    [[ -r $secrets/$name ]] || die "$secrets/$name is missing (python -m agentstream.infra.compose check)"
    ln -sfn "$secrets/$name" "$image_secrets/$name"
done
[[ ${KAFKA_SSL_KEYSTORE_LOCATION:?} -ef $secrets/$KAFKA_SSL_KEYSTORE_FILENAME ]] ||
    die "KAFKA_SSL_KEYSTORE_LOCATION and KAFKA_SSL_KEYSTORE_FILENAME name different files"
KAFKA_SSL_KEYSTORE_PASSWORD=$(password "$KAFKA_SSL_KEYSTORE_CREDENTIALS")
KAFKA_SSL_KEY_PASSWORD=$(password "$KAFKA_SSL_KEY_CREDENTIALS")
export KAFKA_SSL_KEYSTORE_PASSWORD KAFKA_SSL_KEY_PASSWORD
broker_password=$(password kafka-broker-password)
jaas="org.apache.kafka.common.security.scram.ScramLoginModule required username=\"broker\" password=\"$broker_password\";"
mechanism_key=${mechanism//-/___}
sasl_listeners=0
IFS=, read -ra protocol_map <<<"${KAFKA_LISTENER_SECURITY_PROTOCOL_MAP:?}"
for pair in "${protocol_map[@]}"; do
    [[ ${pair#*:} == SASL_* ]] || continue
    listener=${pair%%:*}
    export "KAFKA_LISTENER_NAME_${listener^^}_${mechanism_key}_SASL_JAAS_CONFIG=$jaas"
    sasl_listeners=$((sasl_listeners + 1))
done
((sasl_listeners > 0)) || die "no SASL listener in KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"

# 2.
saved_umask=$(umask)
umask 077
properties=$(mktemp)
trap 'rm -f "$properties"' EXIT
render_properties >"$properties"
scram=()
for user in ${SCRAM_USERS:?the SCRAM users to create}; do
    user_password=$(password "kafka-$user-password")
    scram+=(--add-scram "$mechanism=[name=$user,password=$user_password]")
done
"$kafka/bin/kafka-storage.sh" format --ignore-formatted --cluster-id "${CLUSTER_ID:?}" \
    --config "$properties" "${scram[@]}"
rm -f "$properties"
trap - EXIT

# 3.
cat >"$kafka/config/healthcheck.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=$mechanism
sasl.jaas.config=$jaas
ssl.truststore.type=${KAFKA_SSL_TRUSTSTORE_TYPE:-PEM}
ssl.truststore.location=${KAFKA_SSL_TRUSTSTORE_LOCATION:?}
EOF

# 4.
umask "$saved_umask"
exec "$run"
