#!/bin/sh
# The browser test (tests/dashboard/test_browser.py) screenshots the viewer in headless Chromium.
# Nothing to do when `chromium` is on PATH; as root with apt-get, install Debian's chromium and an emoji
# font (the viewer's page icons); otherwise, or when the install fails (no network), say that the test
# will be skipped: the suite runs either way.
if command -v chromium >/dev/null 2>&1; then
	exit 0
fi
if [ "$(id -u 2>/dev/null)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
	echo "ensure_chromium: installing Debian's chromium for the browser test"
	if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; then
		exit 0
	fi
	echo "ensure_chromium: installing chromium failed: the browser test will be skipped"
	exit 0
fi
echo "ensure_chromium: no chromium on PATH (install it, e.g. apt-get install chromium): the browser test will be skipped"
