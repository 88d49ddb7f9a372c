#!/usr/bin/env sysbench
-- sysbench's oltp_read_write with every connection at READ COMMITTED (bench/mysql.py): the session sets its level
-- itself, as the proxy needs to see it to let a transaction's reads before its first write use the cache.
dofile("/usr/share/sysbench/oltp_read_write.lua")

local base_thread_init = thread_init

function thread_init()
   base_thread_init()
   con:query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
end
