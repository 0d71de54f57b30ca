#!/bin/sh
# CGI of the test stack's web service: ask the backend service over the stack's overlay network.
printf 'Content-Type: text/plain\r\n\r\n'
wget -q -O - http://backend:8081/
