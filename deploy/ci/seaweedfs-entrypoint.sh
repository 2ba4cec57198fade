#!/bin/sh
# Stand-in for the entrypoint of chrislusf/seaweedfs (deploy/ci/build_standins.py): like the real
# one, it has a case for `mini` and hands any other first word straight to weed.
case "$1" in
  mini)
    shift
    exec /usr/bin/weed -logtostderr=true mini "$@"
    ;;
  *)
    exec /usr/bin/weed "$@"
    ;;
esac
