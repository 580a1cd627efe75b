-- walcast.rls_check fails closed: 0003 to 0006 answered "open" for a table that no longer
-- exists (has_table_privilege and has_any_column_privilege return NULL for an unknown OID, and
-- NULL was not "no"), so a change of a dropped table, or of one dropped and created again under
-- the same name, reached every subscriber.
--
-- Here:
-- - The table is named by the OID its rows were decoded under, with their columns' names and
--   type OIDs. No such table, or a column of the rows that it no longer has with that type:
--   every claims set gets `gone` (with the reason in `error`), and nothing is visible.
-- - Every privilege answer must be an explicit true; NULL is no. `row_security_active` must be an
--   explicit false for the role to skip the policies.
-- - The role `none` (which would reset to the caller's login) raises, so it is denied.
-- - The row type is no longer passed as a template argument naming the table (which failed, and
--   was retried, once the table was gone).
--
-- Otherwise as 0006: one result row per claims set; `access` is `none`, `open`, `rls`, `error`
-- or `gone`.

DROP FUNCTION IF EXISTS walcast.rls_check(regclass, text[], jsonb[], text[], jsonb, anyarray);

CREATE OR REPLACE FUNCTION walcast.rls_check(
    rel oid, roles text[], claims jsonb[], wanted text[], rows jsonb, row_columns text[], row_types oid[]
)
    RETURNS TABLE (k int, access text, hidden text[], visible int[], error text)
    LANGUAGE plpgsql
    SET search_path = ''
    SET plan_cache_mode = force_generic_plan
    AS $fn$
DECLARE
    shape text;
    n int := coalesce(pg_catalog.array_length(roles, 1), 0);
    lo int := 1;
    hi int;
    role_name text;
    role_access text;
    role_hidden text[];
    role_error text;
    policies text;
    query text;
    alias text;
    columns text;
    casts text;
    checker text;
    caller_role text := pg_catalog.current_setting('role');
    gone text;
BEGIN
    -- The rows were decoded under a description of the table (its OID, its columns' names and
    -- types): when no table has that OID any more, or one of those columns is gone or has
    -- another type, the table the rows belonged to is not the one the policies would be read
    -- from, and nobody may see them.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = rel AND c.relkind IN ('r', 'p')) THEN
        gone := 'the table no longer exists';
    ELSIF row_columns IS NOT NULL AND EXISTS (
            SELECT FROM ROWS FROM (pg_catalog.unnest(row_columns), pg_catalog.unnest(row_types)) AS w(name, ty)
             WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                                WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                                  AND a.attname = w.name AND a.atttypid = w.ty)) THEN
        gone := 'the table was altered after the change: a column it carries was dropped, renamed or retyped';
    END IF;
    IF gone IS NOT NULL THEN
        FOR i IN 1 .. n LOOP
            k := i; access := 'gone'; hidden := NULL; visible := NULL; error := gone;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    -- The table's columns and their types: part of the check function's name, so a column
    -- added, dropped, renamed or retyped gets a new function.
    SELECT pg_catalog.string_agg(a.attname || ' ' || a.atttypid || ' ' || a.atttypmod, ', ' ORDER BY a.attnum)
      INTO shape
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
    WHILE lo <= n LOOP
        role_name := roles[lo];
        hi := lo;
        WHILE hi < n AND roles[hi + 1] IS NOT DISTINCT FROM role_name LOOP
            hi := hi + 1;
        END LOOP;
        -- What the role may read of the table, and its check function.
        role_error := NULL;
        checker := NULL;
        BEGIN
            -- `none` would reset the role to the caller's (the gateway's login).
            IF role_name IS NULL OR pg_catalog.lower(role_name) = 'none' THEN
                RAISE EXCEPTION 'role % may not be used to read changes', coalesce(role_name, 'NULL');
            END IF;
            PERFORM pg_catalog.set_config('role', role_name, true);
            role_hidden := NULL;
            -- Only an explicit yes grants: a NULL (a table dropped meanwhile) reads as no.
            IF pg_catalog.has_table_privilege(rel, 'SELECT') IS TRUE THEN
                role_access := 'open';
            ELSIF pg_catalog.has_any_column_privilege(rel, 'SELECT') IS NOT TRUE THEN
                role_access := 'none';
            ELSE
                SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)
                  INTO role_hidden
                  FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                   AND pg_catalog.has_column_privilege(rel, a.attnum, 'SELECT') IS NOT TRUE;
                role_access := 'open';
            END IF;
            IF role_access = 'open' AND pg_catalog.row_security_active(rel) IS NOT FALSE THEN
                role_access := 'rls';
                -- The policies that apply to the role, as stored: the name of the check
                -- function. Deparsed only when the function is created.
                SELECT pg_catalog.string_agg(p.polpermissive::text || ' ' || p.polqual::text, ' ' ORDER BY p.oid)
                  INTO policies
                  FROM pg_catalog.pg_policy p
                 WHERE p.polrelid = rel AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL
                   AND EXISTS (SELECT FROM pg_catalog.unnest(p.polroles) AS pr(id)
                                WHERE pr.id = 0 OR pg_catalog.pg_has_role(role_name, pr.id, 'USAGE'))
                HAVING pg_catalog.bool_or(p.polpermissive);
                IF policies IS NOT NULL THEN
                    checker := 'walcast_rls4_' || pg_catalog.md5(policies || shape || rel::text);
                    IF NOT EXISTS (SELECT FROM pg_catalog.pg_proc f
                                    WHERE f.proname = checker AND f.pronamespace = pg_catalog.pg_my_temp_schema()) THEN
                        PERFORM pg_catalog.set_config('role', caller_role, true);
                        -- The policies as one condition on a row of the table.
                        SELECT '(' || pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' OR ' ORDER BY p.oid)
                                          FILTER (WHERE p.polpermissive) || ')'
                               || coalesce(' AND ' || pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' AND ' ORDER BY p.oid)
                                          FILTER (WHERE NOT p.polpermissive), '')
                          INTO query
                          FROM pg_catalog.pg_policy p
                         WHERE p.polrelid = rel AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL
                           AND EXISTS (SELECT FROM pg_catalog.unnest(p.polroles) AS pr(id)
                                        WHERE pr.id = 0 OR pg_catalog.pg_has_role(role_name, pr.id, 'USAGE'));
                        SELECT pg_catalog.quote_ident(c.relname) INTO alias FROM pg_catalog.pg_class c WHERE c.oid = rel;
                        SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum),
                               pg_catalog.string_agg(pg_catalog.format('(r.j ->> %L)::%s', a.attname,
                                                     pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY a.attnum)
                          INTO columns, casts
                          FROM pg_catalog.pg_attribute a
                         WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
                        -- The rows are typed once per call; then, claims set after claims set,
                        -- the claims are set and the policies evaluated on the rows by a
                        -- statement of its own: PostgreSQL treats stable functions such as
                        -- auth.uid() as constant within one statement, and may keep the result
                        -- of a subquery into another table (a hash, a sort) across rescans, so
                        -- one statement for several claims sets could answer the second with
                        -- the first one's subquery. Both statements are planned once per session.
                        -- Wanted positions are matched by hashing: a batch may hold thousands of
                        -- rows.
                        EXECUTE pg_catalog.format(
                            'CREATE FUNCTION pg_temp.%1$I(jsonb, jsonb[], text[], int, int) '
                            'RETURNS TABLE (walcast_k int, walcast_visible int[]) LANGUAGE plpgsql AS '
                            '$walcast_check$ #variable_conflict use_column
'
                            'DECLARE walcast_typed %2$s[]; walcast_i int; walcast_set text; '
                            'BEGIN '
                            'walcast_typed := (SELECT pg_catalog.array_agg(ROW(%3$s)::%2$s ORDER BY r.n) '
                            'FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS r(j, n)); '
                            'FOR walcast_i IN $4 .. $5 LOOP '
                            'walcast_set := pg_catalog.set_config(''request.jwt.claims'', $2[walcast_i]::text, true) '
                            '|| pg_catalog.set_config(''request.jwt.claim.sub'', coalesce($2[walcast_i] ->> ''sub'', ''''), true) '
                            '|| pg_catalog.set_config(''request.jwt.claim.role'', coalesce($2[walcast_i] ->> ''role'', ''''), true); '
                            'walcast_k := walcast_i; '
                            'IF $3[walcast_i] IS NULL THEN '
                            'walcast_visible := coalesce((SELECT pg_catalog.array_agg(walcast_n::int) '
                            'FROM pg_catalog.unnest(walcast_typed) WITH ORDINALITY AS %4$s(%5$s, walcast_n) '
                            'WHERE %6$s), ''{}''); '
                            'ELSE '
                            'walcast_visible := coalesce((SELECT pg_catalog.array_agg(walcast_n::int) '
                            'FROM pg_catalog.unnest(walcast_typed) WITH ORDINALITY AS %4$s(%5$s, walcast_n) '
                            'WHERE walcast_n IN (SELECT pg_catalog.unnest($3[walcast_i]::int[])) AND %6$s), ''{}''); '
                            'END IF; '
                            'RETURN NEXT; '
                            'END LOOP; '
                            'END $walcast_check$',
                            checker, rel::regclass, casts, alias, columns, query);
                        PERFORM pg_catalog.set_config('role', role_name, true);
                    END IF;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            role_error := SQLERRM;
        END;
        IF role_error IS NOT NULL THEN
            FOR i IN lo .. hi LOOP
                k := i; access := 'error'; hidden := NULL; visible := NULL; error := role_error;
                RETURN NEXT;
            END LOOP;
        ELSIF checker IS NULL THEN
            -- No row to check: every claims set of the role gets the role's answer.
            FOR i IN lo .. hi LOOP
                k := i; access := role_access; hidden := role_hidden; error := NULL;
                visible := CASE WHEN role_access = 'rls' THEN '{}'::int[] END;
                RETURN NEXT;
            END LOOP;
        ELSE
            BEGIN
                PERFORM pg_catalog.set_config('role', role_name, true);
                -- The check function returns its whole result before the first row is read, so
                -- no row of a run that fails reaches the result.
                RETURN QUERY EXECUTE pg_catalog.format(
                    'SELECT c.walcast_k, $6, $7, c.walcast_visible, NULL::text FROM pg_temp.%I($1, $2, $3, $4, $5) c',
                    checker) USING rows, claims, wanted, lo, hi, role_access, role_hidden;
            EXCEPTION WHEN OTHERS THEN
                -- One claims set at a time: an error denies only the one it comes from.
                FOR i IN lo .. hi LOOP
                    k := i;
                    BEGIN
                        PERFORM pg_catalog.set_config('role', role_name, true);
                        EXECUTE pg_catalog.format('SELECT c.walcast_visible FROM pg_temp.%I($1, $2, $3, $4, $4) c', checker)
                          INTO visible USING rows, claims, wanted, i;
                        access := role_access;
                        hidden := role_hidden;
                        error := NULL;
                    EXCEPTION WHEN OTHERS THEN
                        access := 'error';
                        hidden := NULL;
                        visible := NULL;
                        error := SQLERRM;
                    END;
                    RETURN NEXT;
                END LOOP;
            END;
        END IF;
        lo := hi + 1;
    END LOOP;
    PERFORM pg_catalog.set_config('role', caller_role, true);
    PERFORM pg_catalog.set_config('request.jwt.claims', '', true);
    PERFORM pg_catalog.set_config('request.jwt.claim.sub', '', true);
    PERFORM pg_catalog.set_config('request.jwt.claim.role', '', true);
END
$fn$;
