#!/bin/sh
echo "hello from a RUN step, built by builder"
