"""The journal: transactions, the log writer with its active items list, and replay.

Modules, one concern each:
  transaction  what one commit logs (metadata images, journaled data, revokes, statfs)
  layout       a transaction as log blocks: descriptors, copies, revoke lists, header
  extent       a journal's logical blocks mapped through its dinode tree
  locate       journal{jid}, statfs_change{jid}, quota_change{jid} found by name
  log          `Journal`: commit / group commit, write-back (AIL), checkpoint, tail,
               sync_blocks for glock demotion, clean unmount
  replay       the GFS2 replay algorithm, shared by mount, gfspy-fsck and recovery
  reset        rewrite a journal as an empty clean log
  status       read-only facts per journal (head, tail, clean, live blocks) for admin
  scan         head finding (owned by the fsck work; used here)

Typical use (mount): `journal = await open_journal(device, jid, replay_if_dirty=True)`,
then `await journal.commit(txn)` per operation (or `add` + `flush` to share one log
write between many), and `await journal.clean_unmount()` at the end. A survivor
recovering a fenced node calls `await recover_journal(device, jid, recovery=True)`.
"""
